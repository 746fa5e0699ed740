"""What every model shares: a typed config of its constructor arguments, saved as JSON and rebuilt from it.

A model declares a :class:`ModelConfig` dataclass whose fields are the
constructor arguments that rebuild it (same names; the defaults stay in the
constructor's signature), records it first thing in ``__init__`` with
``self.cfg = MyConfig.from_arguments(locals())`` (the habit of PyTorch
Lightning's ``save_hyperparameters``, made explicit), and inherits
:class:`Configurable`:

* ``module.config``: the JSON-ready dict of ``cfg`` (tuples become lists), the
  ``"module"`` entry of a run folder's ``config.json`` and of a checkpoint;
* ``Model.from_config(config)``: the model rebuilt from such a dict (keys it
  lacks take the constructor's defaults, so older run folders still load) or
  from a config object.
"""
import dataclasses
import inspect
from typing import Any

from inference.errors import UsageError


def json_ready(value: Any) -> Any:
    """``value`` with every tuple turned into a list, recursively (dicts and lists walked)."""
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class ModelConfig:
    """Base of the per-model config dataclasses."""

    @classmethod
    def from_arguments(cls, arguments: Any) -> Any:
        """The config of one constructor call: each field taken from ``arguments`` (e.g. ``locals()``)."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return json_ready(dataclasses.asdict(self))


class Configurable:
    """Mixin: ``config`` and ``from_config`` for a model whose ``__init__`` sets ``self.cfg`` (a :class:`ModelConfig`)."""

    cfg: ModelConfig

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-ready dict (see the module docstring)."""
        return self.cfg.to_dict()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        """The model built from ``config``: a dict as :attr:`config` writes it, or a :class:`ModelConfig`.

        :raises UsageError: ``config`` names an argument the constructor does not take.
        """
        if isinstance(config, ModelConfig):
            config = config.to_dict()
        params = inspect.signature(cls).parameters
        unknown = sorted(set(config) - set(params))
        if unknown:
            raise UsageError(
                f"{cls.__name__} takes no argument {', '.join(map(repr, unknown))}; this config was written for "
                f"another model or version (arguments: {', '.join(params)})"
            )
        return cls(**config)
