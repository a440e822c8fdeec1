"""Turning a scene of one kind into a scene of another: a trained volume into a DMTet grid (stage 2), a user's
mesh file into a fixed-mesh scene (texturing).

A conversion sits above ``scene/`` (the representations), ``render/`` and ``export/``: it may render silhouettes,
sample densities and run marching tetrahedra. The scene-kind table (``scene_kinds.py``) names, for each kind,
the conversions that start a scene of that kind from another, so that a run (``scene_kinds.starting_scene``)
finds them as data. Nothing is imported here: ``import csd_backend.convert.mesh_file`` stays light.
"""
