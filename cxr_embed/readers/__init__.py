"""Readers that list a dataset's images as :class:`cxr_embed.records.ImageRecord` (use ``read_dataset``).

One module per layout: ``chestxray14`` (NIH distribution), ``folder`` (PNG/JPEG folders with a label
CSV or label sub-folders) and ``dicom`` (hospital exports, de-identified on the way in).
"""
