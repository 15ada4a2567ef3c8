"""The thin Typer app over :mod:`cxr_embed`, installed as ``cxr_embed_cli``.

Command modules only parse options, call the library and format output. They import torch, faiss
and friends inside the command functions so that ``cxr-embed --help`` stays instant.
"""
