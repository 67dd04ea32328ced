"""talkwire: news ingestion that follows the Syrian peace talks."""
