"""Contracts that import no torch: the attribute schema, conversations, the prompt template,
artifact configs and errors."""
