"""Engine: tokenizers, detokenizer, the engine core and the offline engine around it."""
