"""ComfyUI's model folders as the pack reads them: the folders registered with ``folder_paths`` (merging, never
overwriting), the model choices of the loader widgets, and a choice back to a path on disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from csd_backend.errors import ConfigError

#: the single-file config choice that lets the engine infer the architecture
AUTO_CONFIG = "(auto)"
#: single-file checkpoints listed from models/checkpoints
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def folder_paths_module():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI."""
    try:
        import folder_paths  # type: ignore

        return folder_paths
    except ImportError:
        return None


def register_model_folders() -> None:
    """Make sure the model folders the pack reads exist in ``folder_paths``, merging, never overwriting:
    extra_model_paths.yaml and other packs may already have added paths (or an empty extension set = all files)."""
    fp = folder_paths_module()
    if fp is None:
        return
    wanted = {"diffusers": {"folder"}, "checkpoints": set(getattr(fp, "supported_pt_extensions", set())),
              "controlnet": set(getattr(fp, "supported_pt_extensions", set()))}
    table = fp.folder_names_and_paths
    for name, exts in wanted.items():
        default = os.path.join(fp.models_dir, name)
        if name in table:
            paths, have = table[name]
            if default not in paths:
                paths.append(default)
            if have and not exts <= set(have):  # an empty set means "every file": leave it
                merged = set(have) | exts
                table[name] = (paths, merged if isinstance(have, set) else sorted(merged))
        else:
            table[name] = ([default], exts)


def output_directory() -> Path:
    fp = folder_paths_module()
    return Path(fp.get_output_directory()) if fp is not None else Path("output").resolve()


def check_output_prefix(filename_prefix) -> object:
    """A save node's VALIDATE_INPUTS: True, or the error text for a prefix that leaves the output folder, a name
    Windows reserves (con, nul, com1, ... also with an extension), a name over 255 bytes or a path over Windows'
    259 characters, checked when the prompt is queued (the rule is ``resolve_output_prefix``'s, shared with the
    command line). ``None`` (linked from another node) is checked when it runs."""
    if filename_prefix is None:
        return True
    from csd_backend.errors import ConfigError
    from csd_backend.export.writers import resolve_output_prefix

    try:
        resolve_output_prefix(str(output_directory()), str(filename_prefix), field="filename_prefix")
    except ConfigError as e:
        return str(e)
    return True


def diffusers_models() -> List[str]:
    """Diffusers folders (with model_index.json) under every ``diffusers`` model path, relative, with '/'."""
    return model_folders("diffusers", "model_index.json")


def model_folders(kind: str, marker: str) -> List[str]:
    """Folders holding ``marker`` under every ``kind`` model path (not inside one another), relative, with '/'."""
    fp = folder_paths_module()
    if fp is None:
        return []
    found = []
    try:
        roots = fp.get_folder_paths(kind)
    except KeyError:
        return []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for here, dirs, files in os.walk(root, followlinks=True):
            if marker in files:
                rel = os.path.relpath(here, root)
                if rel != ".":
                    found.append(rel.replace(os.sep, "/"))
                dirs[:] = []  # a model's sub-folders hold no further models
            dirs.sort()
    return sorted(dict.fromkeys(found))


def checkpoint_models() -> List[str]:
    fp = folder_paths_module()
    if fp is None:
        return []
    try:
        names = fp.get_filename_list("checkpoints")
    except KeyError:
        return []
    return [n.replace(os.sep, "/") for n in names if n.lower().endswith(SINGLE_FILE_SUFFIXES)]


def model_choices() -> List[str]:
    return ([f"diffusers/{m}" for m in diffusers_models()] + [f"checkpoints/{m}" for m in checkpoint_models()])


def resolve_model(choice: str, field: str = "model") -> str:
    """A "diffusers/<rel>" or "checkpoints/<rel>" choice → the path on disk (errors name the widget ``field``)."""
    kind, _, rel = choice.partition("/")
    fp = folder_paths_module()
    if kind not in ("diffusers", "checkpoints") or not rel or fp is None:
        raise ConfigError(field, f"{choice!r} is not a model of the list; put diffusers folders under "
                                 "models/diffusers and single-file checkpoints under models/checkpoints")
    for root in fp.get_folder_paths(kind):
        path = os.path.join(root, *rel.split("/"))
        if os.path.exists(path):
            return path
    raise ConfigError(field, f"{choice!r} was not found in {fp.get_folder_paths(kind)}")
