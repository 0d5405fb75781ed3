"""The agent side of the fleet (placeholder: the follower lands in its own commit)."""
