"""One exception hierarchy whose messages are written for the user.

Every expected failure (bad input, wrong checkpoint, missing dependency, malformed SQL …) raises a
subclass of :class:`CxrEmbedError`. The CLI prints ``Error: <message>`` and exits 1 for these, so a
message must say what went wrong *and* what to do about it. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class CxrEmbedError(Exception):
    """Base class of every error cxr-embed raises on purpose."""


class ConfigError(CxrEmbedError):
    """A model config.yaml, an option or an option combination is invalid."""


class ModelNotFoundError(CxrEmbedError):
    """No model folder could be found (option, env var or pull cache)."""


class CheckpointError(CxrEmbedError):
    """A checkpoint is missing, unreadable, not safetensors, or does not match the architecture."""


class DownloadError(CxrEmbedError):
    """Fetching the official weights failed (no network, wrong revision, hash mismatch)."""


class InputError(CxrEmbedError):
    """An input file or record could not be used. ``path`` names the file when known."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class ImageReadError(InputError):
    """An image file is missing, truncated, corrupt or in an unsupported pixel format."""


class DicomError(ImageReadError):
    """A DICOM file cannot be turned into pixels (no pixel data, unsupported syntax, …)."""


class CsvFormatError(InputError):
    """A label CSV / Data_Entry file lacks required columns or has malformed rows."""


class StoreError(CxrEmbedError):
    """A store directory is missing, corrupt, or inconsistent (FAISS ids vs Parquet row_ids)."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class StoreMismatchError(StoreError):
    """Embeddings from another model or preprocessing would be mixed into a store."""


class StoreIdentityError(StoreError):
    """A resume or append would mix sources listed differently (e.g. another de-identification key)."""

    @classmethod
    def for_key(cls, store: object, recorded: str | None, given: str | None) -> StoreIdentityError:
        """The refusal of a resume/append with another de-identification key (one wording everywhere)."""
        return cls(
            f"Store {store} was made with the de-identification key fingerprinted {recorded or '(none)'}, but "
            f"this run uses {given or '(none)'}: its pseudonyms would not match (a patient would become two). "
            "Run with the store's key (--key-file or $CXR_EMBED_ID_SALT), or index into a new store."
        )


class QueryError(CxrEmbedError):
    """A SQL query or ``--where`` predicate is malformed or not allowed (writes are refused)."""


class EvaluationError(CxrEmbedError):
    """An evaluation cannot be reported honestly (patient leakage, a single class, too few rows)."""


class DependencyError(CxrEmbedError):
    """An optional dependency is needed (e.g. ray, faiss-gpu); the message says what to install."""


class StoreDamagedError(StoreError):
    """A store file is missing, truncated, unreadable or does not match its recorded checksum."""
