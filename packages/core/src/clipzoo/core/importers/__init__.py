"""Importers: existing checkpoints become clipzoo models.

- open_clip's Hub layout (``open_clip_config.json`` + weights), its own ViT and text
  transformer (onto timm's CLIP ViT and transformers' ``CLIPTextModel``) and its timm / HF
  tower variants: :func:`import_open_clip_folder`;
- bare open_clip state dicts of a named architecture: :func:`import_open_clip_state_dict`;
- transformers ``CLIPModel`` folders: :func:`import_hf_clip_folder`;
- catalogue entries (Hub id, revision, licence, preprocessing, citation):
  :func:`import_catalogue_entry`, :func:`register_catalogue_entry`;
- any of these by what the source is: :func:`import_source`.

The result is a :class:`~clipzoo.core.ContrastiveModel` built from clipzoo's own towers; its
saved folder loads without open_clip. This subpackage is the only code in clipzoo that reads
pickled weights, always with ``torch.load(..., weights_only=True)``.
"""

from ._state import UnsafeCheckpointError, read_state_dict
from .architectures import OPEN_CLIP_ARCHITECTURES, open_clip_architecture
from .catalogue import (
    CatalogueEntry,
    catalogue_entries,
    catalogue_entry,
    import_catalogue_entry,
    register_catalogue_entry,
    unregister_catalogue_entry,
)
from .clip_tokenizer import build_clip_tokenizer
from .hf_clip import import_hf_clip_folder
from .keys import CheckpointMismatchError, OpenClipLayout, remap_hf_clip, remap_open_clip
from .open_clip import (
    from_open_clip_state,
    import_open_clip_folder,
    import_open_clip_state_dict,
    translate_open_clip_config,
)
from .provenance import Imported
from .source import import_source

__all__ = [
    "OPEN_CLIP_ARCHITECTURES",
    "CatalogueEntry",
    "CheckpointMismatchError",
    "Imported",
    "OpenClipLayout",
    "UnsafeCheckpointError",
    "build_clip_tokenizer",
    "catalogue_entries",
    "catalogue_entry",
    "from_open_clip_state",
    "import_catalogue_entry",
    "import_hf_clip_folder",
    "import_open_clip_folder",
    "import_open_clip_state_dict",
    "import_source",
    "open_clip_architecture",
    "read_state_dict",
    "register_catalogue_entry",
    "remap_hf_clip",
    "remap_open_clip",
    "translate_open_clip_config",
    "unregister_catalogue_entry",
]
