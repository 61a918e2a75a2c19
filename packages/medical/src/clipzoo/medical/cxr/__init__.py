"""Chest X-rays aligned with their reports.

Sub-modules (none is imported here, so importing :mod:`clipzoo.medical.cxr` pulls in neither
pydicom nor timm):

- :mod:`~clipzoo.medical.cxr.labels`: the 14 CheXpert observations and the uncertainty
  policies (U-Ignore, U-Zeros, U-Ones, GLoRIA/MGCA's per-class mix) that turn 1/0/−1/blank
  into ``label`` / ``label_mask``.
- :mod:`~clipzoo.medical.cxr.dicom`: DICOM radiographs through pydicom (MONOCHROME1 inverted,
  ``BitsStored`` scaling, optional VOI LUT) -> float grey in [0, 1].
- :mod:`~clipzoo.medical.cxr.readers` (shared reader base), :mod:`~clipzoo.medical.cxr.mimic`
  (MIMIC-CXR-JPG with sectioned reports and frontal views), :mod:`~clipzoo.medical.cxr.chexpert`
  (CheXpert ``train.csv`` / ``valid.csv``), :mod:`~clipzoo.medical.cxr.roco` (ROCO
  ``captions.txt``), :mod:`~clipzoo.medical.cxr.private` (a CSV of image + report, DICOM
  folders), :mod:`~clipzoo.medical.cxr.fivex200` (the seeded CheXpert-5x200 list, written out).
- :mod:`~clipzoo.medical.cxr.tower`: the ``medical/cxr-image`` tower and the preprocessing
  contract stored with the weights (channels, pad or crop, normalisation, VOI LUT, augmentation;
  MedCLIP / CheXzero / BioViL presets).
- :mod:`~clipzoo.medical.cxr.eval`: 14-label zero-shot AUROC with positive/negative prompt pairs
  and bootstrap CIs (CheXzero), CheXpert-5x200 5-way accuracy, image↔report retrieval.
- :mod:`~clipzoo.medical.cxr.synthetic`: synthetic X-rays whose reports locate an opacity.
- :mod:`~clipzoo.medical.cxr.architectures` (``medical/cxr-tiny``, ``-vitb16-biomedbert``,
  ``-resnet50-biomedbert``) and :mod:`~clipzoo.medical.cxr.recipes` (the demo and the
  MGCA / GLoRIA / MedCLIP recipes, :func:`~clipzoo.medical.cxr.recipes.run_demo`).

Everything registers through the ``clipzoo.plugins`` entry points of ``clipzoo-medical``.
"""
