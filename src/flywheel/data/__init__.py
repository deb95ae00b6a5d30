"""Training data: record types (`formats`) and the readers that turn files into them (`io`).

from flywheel.data import read_conversations, read_preferences, read_prompts, read_texts
"""

from flywheel.data.formats import (
    REASONS,
    ROLES,
    Comparison,
    Conversation,
    Message,
    Prompt,
    Ranking,
    RecordError,
    check_messages,
    validate_prompt,
)
from flywheel.data.io import (
    ReadReport,
    read_conversations,
    read_preferences,
    read_prompts,
    read_texts,
    read_with_report,
    render_records,
)

__all__ = [
    "REASONS",
    "ROLES",
    "Comparison",
    "Conversation",
    "Message",
    "Prompt",
    "Ranking",
    "ReadReport",
    "RecordError",
    "check_messages",
    "read_conversations",
    "read_preferences",
    "read_prompts",
    "read_texts",
    "read_with_report",
    "render_records",
    "validate_prompt",
]
