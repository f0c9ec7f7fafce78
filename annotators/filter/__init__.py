"""Filters: optional stages that score what the annotators wrote and drop or flag what fails.

``consistency`` (how well a region's text matches the region's pixels, by a CLIP-style model: a
local open_clip checkpoint or this project's trainer checkpoint).
"""
