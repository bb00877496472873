"""Data ingestion: every source becomes a list of :class:`steer.core.conversation.Conversation`."""

from steer.data.formats import FORMATS, load_conversations, parse_column_map, parse_hh_dialogue
from steer.data.histogram import format_histogram, label_histogram, trained_values, unseen_request_warnings, unseen_values
from steer.data.records import DataError, LoadReport
from steer.data.split import grouped_split

__all__ = [
    "FORMATS",
    "DataError",
    "LoadReport",
    "format_histogram",
    "grouped_split",
    "label_histogram",
    "load_conversations",
    "parse_column_map",
    "parse_hh_dialogue",
    "trained_values",
    "unseen_request_warnings",
    "unseen_values",
]
