"""Conversions to and from other implementations' checkpoint layouts, and model sharing.

- reference: the paper's code (alexiglad/EBT): text-model parameter names and hyper-parameters,
  both ways;
- image_reference, image_config: the same for its denoising image EBT and its DiT;
- convert: `import_reference` / `export_reference` between its `.ckpt` files and ebt runs;
- hub: `save_pretrained` / `from_pretrained` / `push_to_hub` (Hugging Face style);
- commands: the `ebt import-reference`, `export-reference` and `push` subcommands.
"""
