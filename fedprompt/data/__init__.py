"""Data: labelled text and images from builtin sets, the Hub or local files, visual question
answering sets, and their split among clients (``partition``)."""
