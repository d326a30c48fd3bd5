"""The commands: one thin module per console script (setup.py ``entry_points``), each ``main(argv=None) -> int``.

Every module parses its arguments with argparse, calls library functions and prints; no other module
of the package parses arguments or defines ``main``. ``python -m raphael_jax.cli.<name>`` runs the same.

| command | module |
|---|---|
| ``raphael-train`` | :mod:`raphael_jax.cli.train` |
| ``raphael-sample`` | :mod:`raphael_jax.cli.sample` |
| ``raphael-eval`` (alignment, probe, fid, coco-fid, sfd, clip-score) | :mod:`raphael_jax.cli.eval` |
| ``raphael-params`` | :mod:`raphael_jax.cli.params` |
| ``raphael-aot`` | :mod:`raphael_jax.cli.aot` |
| ``raphael-paths`` | :mod:`raphael_jax.cli.paths` |
| ``raphael-ablate`` | :mod:`raphael_jax.cli.ablate` |
| ``raphael-precompute`` | :mod:`raphael_jax.cli.precompute` |
| ``raphael-convert`` (clip, vae, inception) | :mod:`raphael_jax.cli.convert` |
| ``raphael-data`` (image-text, shapes) | :mod:`raphael_jax.cli.data` |
"""
