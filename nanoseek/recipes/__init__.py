"""The built-in recipes, one file each (`nanoseek speedrun --preset NAME`, `nanoseek r1`); a copy of
one, changed, runs with `nanoseek speedrun --recipe FILE`."""
