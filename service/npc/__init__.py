"""NPC profiles and persistent dialogue sessions on top of the chat API (``steer serve --npcs``)."""
