"""``megastack run``: recipe (recipe.py), stages (stages.py), report (report.py), command (cli.py)."""
