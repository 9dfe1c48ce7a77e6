"""The embedded toy world: problem generator, step checker, tokenizer builder, tiny models, training.

Nothing in the engine imports this package; it only produces standard Hugging Face folders
(``models/toy/{draft,target,prm}``) and problem files (``data/toy/``) that load through the same
code path as real checkpoints.
"""
