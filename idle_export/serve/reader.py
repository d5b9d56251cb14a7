"""Reading a Triton model repository back: its models, their configs and model files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.serve.config import CONFIG_NAME, DEFAULT_FILENAMES, parse_config


@dataclass
class RepoModel:
    name: str
    folder: Path
    config: object  # model_config_pb2.ModelConfig
    version: int
    model_file: Path

    @property
    def platform(self) -> str:
        return self.config.platform or self.config.backend


def read_repository(repo: str | Path, names: list[str] | None = None) -> list[RepoModel]:
    """Models of a Triton model repository (config.pbtxt parsed with Triton's protobuf)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise BadInputError(f"model repository {repo} is not a folder",
                            "write one with `idle-export serve repo MODEL.onnx -o model_repository/`")
    if (repo / CONFIG_NAME).is_file():
        raise BadInputError(f"{repo} is a model folder, not a model repository",
                            f"pass its parent folder: {repo.parent}")
    models, held = [], []  # held: every model there, named when --model asks for another
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            continue
        held.append(folder.name)
        if names and folder.name not in names:
            continue
        cfg = parse_config(cfg_path.read_text(errors="replace"), str(cfg_path))
        if cfg.name and cfg.name != folder.name:
            raise BadInputError(f"{cfg_path} names the model {cfg.name!r} but its folder is {folder.name!r}",
                                "Triton needs them equal: rename the folder or fix name:")
        platform = cfg.platform or cfg.backend
        filename = cfg.default_model_filename or DEFAULT_FILENAMES.get(platform, "model.onnx")
        versions = sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                          reverse=True)
        found = next(((v, folder / str(v) / filename) for v in versions
                       if (folder / str(v) / filename).is_file()), None)
        if found is None:
            raise BadInputError(f"{folder.name} has no version folder with {filename}",
                                f"expected {folder}/1/{filename}")
        models.append(RepoModel(folder.name, folder, cfg, found[0], found[1]))
    if names:
        missing = sorted(set(names) - {m.name for m in models})
        if missing:
            raise BadInputError(f"model {', '.join(missing)} not in {repo}",
                                f"models there: {', '.join(held) or '(none)'}")
    if not models:
        raise BadInputError(f"no model in {repo} (no NAME/config.pbtxt)",
                            "write one with `idle-export serve repo MODEL.onnx -o model_repository/`")
    return models
