"""cxr-embed: MedImageInsight embeddings for chest X-rays, stored as Parquet + FAISS.

Data flows one way: records -> tensors -> embeddings -> store -> classifiers / retrieval / SQL.
Heavy modules (torch, faiss) are imported by the submodules that need them, never here, so that
``import cxr_embed`` and ``cxr-embed --help`` stay instant.
"""

__version__ = "0.1.0"
