"""The boundary: where a string from a user becomes a typed object.

* `options`: YAML 1.2 files and `key=value` overrides, read by each config's field types.
"""

from .options import ConfigMixin, apply_overrides, at_least, check_fields, parse_override, parse_yaml, read_yaml_file

__all__ = ["ConfigMixin", "apply_overrides", "at_least", "check_fields", "parse_override", "parse_yaml", "read_yaml_file"]
