"""The regulator's report: build (figures) separate from render (formats)."""
