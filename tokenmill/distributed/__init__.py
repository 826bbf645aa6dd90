"""Running one model over several processes with ``torch.distributed`` (gloo on CPU).

- ``parallel_state``: the tensor-parallel group a model is built for, and its collectives.
- ``executor``: starts the worker ranks and drives them, one ``SchedulerOutput`` per step.
- ``worker``: a worker rank's loop.
"""
