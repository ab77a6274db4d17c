"""PyTorch modeling + config files copied into exported HF directories (see `convert.save_hf`).

They import only torch and transformers and are loaded by transformers through `auto_map`
(`trust_remote_code=True`); loopcoder-jax itself never imports them.
"""
