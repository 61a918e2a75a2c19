"""clipzoo-medical: chest X-ray, CT volume and pathology models aligned with their reports.

Three sub-domains, each with readers for its datasets as they are distributed, towers and
preprocessing stored with the weights, objectives and the field's evaluation protocol:

- :mod:`clipzoo.medical.cxr`: MIMIC-CXR-JPG, CheXpert, ROCO, DICOM and private CSVs;
- :mod:`clipzoo.medical.ct`: CT-RATE and DICOM series, MONAI transforms and 3D towers;
- :mod:`clipzoo.medical.pathology`: Quilt-1M, patch folders, stain normalisation.

Everything registers with ``clipzoo.core`` through the ``clipzoo.plugins`` entry points;
importing this package imports none of the sub-domains (nor MONAI or pydicom).
"""

__version__ = "0.1.0"
