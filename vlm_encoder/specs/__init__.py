"""The boundary: where a string from a user becomes a typed object.

* `options`: YAML 1.2 files and `key=value` overrides, read by each config's field types.
* `data`: data specs (`parse_data_spec` -> `DataSpec`, `load_split`), the one grammar of every
  command's data; its module imports only the standard library (`datasets` when a split is read).
"""

from .data import DataSpec, load_split, parse_data_spec
from .options import ConfigMixin, apply_overrides, at_least, check_fields, parse_override, parse_yaml, read_yaml_file

__all__ = [
    "ConfigMixin", "DataSpec", "apply_overrides", "at_least", "check_fields", "load_split", "parse_data_spec",
    "parse_override", "parse_yaml", "read_yaml_file",
]
