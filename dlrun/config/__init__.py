"""The command's configs without running anything: composition (`compose`), `--help`, one-line
Hydra errors (`explain`), value checks (`checks`), the migration table of moved keys and
`_target_`s (`migrations`), and the config side of `resume=true` (`resume`). No torch here."""
