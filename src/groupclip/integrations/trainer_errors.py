"""The error :class:`~groupclip.integrations.transformers.PrivateTrainer` raises for settings that cannot give a
correct DP run."""

from __future__ import annotations

from ..errors import GroupClipError


class TrainerSetupError(GroupClipError, ValueError):
    """The Trainer's settings cannot give a correct DP run (the message names the setting and the fix)."""
