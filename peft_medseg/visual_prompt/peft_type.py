"""The `VISUAL_PROMPT` member of peft's `PeftType`, which peft needs before it registers a method of that name."""

from __future__ import annotations

from peft.utils import PeftType

# peft refuses to register a method whose name is not a member of its closed `PeftType` enum, and resolves the type
# of a saved adapter from the plain string in adapter_config.json. The member therefore has value == name, and, since
# `PeftType` is a `str` enum, it hashes and compares equal to that string.
PEFT_TYPE_NAME = "VISUAL_PROMPT"
# Prefix of the adapter's parameter names (`vpt_prompt`); unique among peft's methods.
PREFIX = "vpt_"


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to `PeftType` (idempotent), the way `aenum.extend_enum` would, and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    # Enum classes refuse attribute assignment of members; go around the metaclass like `enum` itself does.
    type.__setattr__(PeftType, name, member)
    return member


VISUAL_PROMPT = _extend_peft_type(PEFT_TYPE_NAME)
