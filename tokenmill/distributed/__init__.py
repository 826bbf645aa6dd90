"""Running one model over several processes with ``torch.distributed`` (gloo on CPU).

- ``parallel_state``: the tensor-parallel group and pipeline stage a model is built for, the
  collectives, and how ranks are laid out (tp x pp).
- ``channel``: point-to-point messages between ranks (steps down the pipeline, results back).
- ``executor``: starts the worker ranks and drives them, one ``SchedulerOutput`` per step.
- ``worker``: a worker rank's loop.
- ``launch``: ranks started by torchrun.
"""
