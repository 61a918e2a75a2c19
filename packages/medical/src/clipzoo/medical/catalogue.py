"""Published medical CLIP models that ``clipzoo import catalogue:NAME`` converts into clipzoo
model folders (safetensors, config with preprocessing, card with licence and citation).

This module is named in the ``clipzoo.catalogue`` entry-point group, so the core imports it
the first time the catalogue is read (``clipzoo import --list``); it only registers table
rows, and imports neither MONAI nor pydicom.

Entries:

- ``biomedclip``: BiomedCLIP (PubMedBERT text + ViT-B/16, PMC-15M), open_clip Hub layout.
- ``quiltnet-b-32``: QuiltNet ViT-B/32 (OpenAI CLIP fine-tuned on Quilt-1M), open_clip Hub layout.
- ``plip``: PLIP (OpenAI CLIP ViT-B/32 fine-tuned on OpenPath), transformers CLIPModel.

Left out, and why:

- **CT-CLIP** (``models/CT-CLIP-Related/CT-CLIP_v2.pt`` in the *dataset* repo
  ``ibrahimhamamci/CT-RATE``): its image encoder is CTViT, a factorised spatio-temporal ViT
  that no clipzoo tower reproduces yet (``medical/monai-vit3d`` is MONAI's plain 3D ViT), and
  the weights are a pickled ``.pt`` in a gated dataset repo; a converter needs the CTViT
  architecture first. Its preprocessing is recorded in FIELD_NOTES and in the CT presets.
- **CONCH** and **UNI** (MahmoodLab): gated behind an access agreement whose terms forbid
  redistribution; a user with access can import CONCH's open_clip-style checkpoint with
  ``clipzoo import PATH --architecture ...`` themselves.

No revision is pinned: an import resolves ``main`` and records the commit it read in the
model card (pin with ``--revision``). Licences are as the authors state them, or
``unverified`` where the stored copy of the card says nothing.
"""

from __future__ import annotations

from clipzoo.core.importers.catalogue import OPENAI_PREPROCESS, UNVERIFIED, CatalogueEntry, register_catalogue_entry

QUILT_CITATION = """@misc{ikezogwo2023quilt1m,
  title={Quilt-1M: One Million Image-Text Pairs for Histopathology},
  author={Ikezogwo, Wisdom Oluchi and Seyfioglu, Mehmet Saygin and Ghezloo, Fatemeh and Geva, Dylan Stefan Chan
          and Mohammed, Fatwir Sheikh and Anand, Pavan Kumar and Krishna, Ranjay and Shapiro, Linda},
  year={2023}, eprint={2306.11207}, archivePrefix={arXiv}
}"""
BIOMEDCLIP_CITATION = """@misc{zhang2023biomedclip,
  title={Large-Scale Domain-Specific Pretraining for Biomedical Vision-Language Processing},
  author={Zhang, Sheng and Xu, Yanbo and Usuyama, Naoto and Bagga, Jaspreet and Tinn, Robert and Preston, Sam
          and Rao, Rajesh and Wei, Mu and Valluri, Naveen and Wong, Cliff and Lungren, Matthew and Naumann, Tristan
          and Poon, Hoifung},
  year={2023}, doi={10.48550/arXiv.2303.00915}
}"""
PLIP_CITATION = """@article{huang2023plip,
  title={A visual-language foundation model for pathology image analysis using medical Twitter},
  author={Huang, Zhi and Bianchi, Federico and Yuksekgonul, Mert and Montine, Thomas J. and Zou, James},
  journal={Nature Medicine}, year={2023}
}"""

ENTRIES = (
    CatalogueEntry(
        name="biomedclip", hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        source_format="open_clip-hub", licence="MIT", citation=BIOMEDCLIP_CITATION, domain="medical",
        notes=("licence: 'license: mit' in the Hub model card's metadata",
               "timm ViT-B/16 image tower + PubMedBERT text tower (open_clip TimmModel + HFTextEncoder); the import "
               "reads the text model's config and tokenizer from its own Hub repo (hf_model_name), so it needs "
               "the network or those repos in the cache",
               "preprocessing (224 px, OpenAI CLIP mean/std) is read from the repo's open_clip_config.json",
               "the model card restricts use to research (any deployed use is out of scope)"),
    ),
    CatalogueEntry(
        name="quiltnet-b-32", hub_id="wisdomik/QuiltNet-B-32", source_format="open_clip-hub", licence="MIT",
        citation=QUILT_CITATION, domain="medical", preprocess=OPENAI_PREPROCESS,
        notes=("licence: the wisdomikezogwo/quilt1m README states 'the codes and the pretrained model' are MIT; "
               "the Hub card's own licence field was not checked",
               "preprocessing and architecture are read from the repo's open_clip_config.json; pathology input is "
               "plain RGB with OpenAI CLIP mean/std (no stain normalisation)"),
    ),
    CatalogueEntry(
        name="plip", hub_id="vinid/plip", source_format="transformers-clip", licence=UNVERIFIED,
        citation=PLIP_CITATION, domain="medical", preprocess=OPENAI_PREPROCESS,
        notes=("licence not found in the stored copy of the model card; check the repo before use",
               "plain RGB with OpenAI CLIP mean/std at 224 px, as its CLIPProcessor config states",
               "the card disclaims medical use and cites Twitter's data policy"),
    ),
)

for _entry in ENTRIES:
    register_catalogue_entry(_entry)
