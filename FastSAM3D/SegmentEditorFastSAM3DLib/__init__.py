"""The FastSAM3D Segment Editor effect (``SegmentEditorEffect.py``), kept in a package so that Slicer's
module scanner does not mistake it for a module; registered by ``FastSAM3D.registerEditorEffect``."""
