"""Sphinx configuration of the course website (built by ``python -m reprod.course.site``).

The sources are not this folder: ``reprod.course.site`` stages the committed notebooks, their
solutions, ``docs/*.md`` and the README into ``build/site-src/`` (links to repository files that
are not pages become GitHub links, remote images become local copies or plain links) and runs
Sphinx there with this folder as its configuration directory. Notebooks are rendered with their
committed outputs and never executed. Nothing is fetched at build or view time: Furo uses the
system fonts, MathJax 3 is served from ``_static/mathjax`` (the ``sphinx-mathjax-offline`` wheel
carries it) and the search is Sphinx's own (``searchindex.js``).
"""

from __future__ import annotations

project = "dgss-lessons"
author = "dgss-lessons contributors"
copyright = "dgss-lessons contributors, MIT licence"

extensions = [
    "myst_nb",                 # notebooks (.ipynb) and Markdown pages (MyST)
    "sphinx-mathjax-offline",  # copies MathJax 3 into _static/mathjax and points Sphinx at it
]

# Notebooks: the committed outputs as they are, never re-executed.
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3      # README and docs link to #section anchors

root_doc = "index"
exclude_patterns = ["_raw", "_assets", "**/.ipynb_checkpoints"]

html_theme = "furo"
html_title = "dgss-lessons"
html_static_path = ["_static"]
html_css_files = ["site.css"]
html_copy_source = False      # the notebooks are offered as downloads instead
html_show_sourcelink = False
html_permalinks_icon = "#"
html_theme_options = {
    "navigation_with_keys": True,
    "top_of_page_buttons": [],   # Furo's edit/view buttons point at a repository host
}
