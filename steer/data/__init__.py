"""Data ingestion: every source becomes a list of :class:`steer.conversation.Conversation`."""

from steer.data.formats import FORMATS, load_conversations, parse_column_map, parse_hh_dialogue
from steer.data.records import DataError, LoadReport
from steer.data.split import grouped_split

__all__ = [
    "FORMATS",
    "DataError",
    "LoadReport",
    "grouped_split",
    "load_conversations",
    "parse_column_map",
    "parse_hh_dialogue",
]
