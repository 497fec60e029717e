"""FLUX backbone, identity adapter, regions, faces, sampling and the generation CLI."""
