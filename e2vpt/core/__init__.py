"""The method: backbone loading, the prompted ViT and its attention (`model`), the prompt-set file format
(`promptset`) and its typed config (`method`), image decoding and preprocessing (`images`), pruning masks.
Imports only `e2vpt.config` and `e2vpt.errors`; never reads the environment (limits are arguments)."""
