"""The teacher cache: its store on disk, the targets read from it, and the stream that fills and replays it."""
