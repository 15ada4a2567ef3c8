"""The reader options every command that lists a dataset shares (``index``, ``finetune``).

Why a decorator: the options are the library readers' keyword arguments (see
``cxr_embed.readers``); declaring them once keeps the flags, their help and their mapping identical
across commands (sqlite-utils' shared output options are the model). The decorated command
receives ``reader_options`` — only the options the user gave, so a reader that lacks one refuses
it by name — and, when it declares a ``link_file`` parameter, the ``--link-file`` value.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

PANEL = "Reading the dataset"

_OPTIONS: list[tuple[str, Any, Any]] = [
    ("labels", Annotated[Path | None, typer.Option("--labels", metavar="FILE", rich_help_panel=PANEL, help=(
        "Label CSV (default: labels.csv in the folder). Its path column holds image paths relative to the folder; "
        "other columns are chosen by the --*-column options or found by their usual names."))], None),
    ("path_column", Annotated[str | None, typer.Option("--path-column", rich_help_panel=PANEL, help=(
        "Label CSV column with the image path (default: path, file, filename, image or 'Image Index')."))], None),
    ("id_column", Annotated[str | None, typer.Option("--id-column", rich_help_panel=PANEL, help=(
        "Label CSV column with the image id (default: the relative path; for DICOM the original SOP Instance "
        "UID, pseudonymised on the way in)."))], None),
    ("label_column", Annotated[str | None, typer.Option("--label-column", rich_help_panel=PANEL, help=(
        "Label CSV column with normal/abnormal (0/1, normal/abnormal, negative/positive; default: label)."))], None),
    ("findings_column", Annotated[str | None, typer.Option("--findings-column", rich_help_panel=PANEL, help=(
        "Label CSV column with ChestX-ray14-style findings, 'Effusion|Mass' or 'No Finding' (default: "
        "finding_labels)."))], None),
    ("patient_column", Annotated[str | None, typer.Option("--patient-column", rich_help_panel=PANEL, help=(
        "Label CSV column with the patient id, used to keep a patient on one side of every split (default: "
        "patient_id). Not for DICOM: it takes Patient ID from the header, pseudonymised."))], None),
    ("study_column", Annotated[str | None, typer.Option("--study-column", rich_help_panel=PANEL, help=(
        "Label CSV column with the study / follow-up number (default: study)."))], None),
    ("split_column", Annotated[str | None, typer.Option("--split-column", rich_help_panel=PANEL, help=(
        "Label CSV column with train/test (default: split)."))], None),
    ("skip_missing", Annotated[bool, typer.Option("--skip-missing", rich_help_panel=PANEL, help=(
        "ChestX-ray14: drop CSV rows whose PNG is not on disk without recording them (a partial download)."))],
     False),
    ("key_file", Annotated[Path | None, typer.Option("--key-file", rich_help_panel=PANEL, help=(
        "DICOM: the secret de-identification key file. Default: $CXR_EMBED_ID_SALT, else your own key file in "
        "your config folder (created on first use, mode 0600). Adding to a store needs the key it was made with."))],
     None),
    ("link_file", Annotated[Path | None, typer.Option("--link-file", rich_help_panel=PANEL, help=(
        "DICOM: write the file that maps the store's pseudonymous references back to your files here (CSV, "
        "mode 0600, merged on each run). Keep it outside the store: it re-identifies every image."))], None),
    ("modality", Annotated[list[str] | None, typer.Option("--modality", rich_help_panel=PANEL, help=(
        "DICOM: accepted Modality values, repeatable or comma-separated (default: CR, DX, RG, CX; 'any' accepts "
        "all). Others are recorded in errors as out_of_scope."))], None),
    ("body_part", Annotated[list[str] | None, typer.Option("--body-part", rich_help_panel=PANEL, help=(
        "DICOM: accepted BodyPartExamined values, repeatable or comma-separated (default: CHEST; a file without "
        "the tag is accepted; 'any' accepts all)."))], None),
    ("allow_burned_in", Annotated[bool, typer.Option("--allow-burned-in", rich_help_panel=PANEL, help=(
        "DICOM: accept files marked BurnedInAnnotation YES (text in the pixels may identify the patient)."))],
     False),
    ("frames", Annotated[str | None, typer.Option("--frames", metavar="first|all", rich_help_panel=PANEL, help=(
        "DICOM: index multi-frame files by their first frame or every frame (default: record them as "
        "out_of_scope)."))], None),
    ("follow_symlinks", Annotated[bool, typer.Option("--follow-symlinks", rich_help_panel=PANEL, help=(
        "Follow symlinks that lead out of the source folder, and symlinked folders (default: record them as "
        "skipped; links inside the folder are read)."))], False),
]  # fmt: skip
NAMES = tuple(name for name, _, _ in _OPTIONS)


def reader_options(given: dict[str, Any]) -> dict[str, Any]:
    """The options the user set, as reader keyword arguments (paths as strings: configs are saved as JSON)."""
    out = {}
    for name, value in given.items():
        if name == "link_file" or value in (None, False, [], ()):
            continue
        out[name] = (
            str(value) if isinstance(value, Path) else list(value) if isinstance(value, list) else value
        )
    return out


def with_reader_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared reader options to a Typer command (see the module docstring)."""
    signature = inspect.signature(func, eval_str=True)  # Typer reads annotations, not their strings
    wants_link = "link_file" in signature.parameters
    own = [p for p in signature.parameters.values() if p.name not in ("reader_options", "link_file")]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in _OPTIONS
        if name != "link_file" or wants_link
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in NAMES if name in kwargs}
        kwargs["reader_options"] = reader_options(given)
        if wants_link:
            kwargs["link_file"] = given.get("link_file")
        return func(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**func.__annotations__, **{p.name: p.annotation for p in added}}
    wrapper.__annotations__.pop("reader_options", None)
    return wrapper
