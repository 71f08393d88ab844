"""Conversions to and from other implementations' checkpoint layouts, and model sharing.

- reference: the paper's code (alexiglad/EBT): parameter names and hyper-parameters, both ways;
- convert: `import_reference` / `export_reference` between its `.ckpt` files and ebt runs;
- hub: `save_pretrained` / `from_pretrained` / `push_to_hub` (Hugging Face style);
- commands: the `ebt import-reference`, `export-reference` and `push` subcommands.
"""
