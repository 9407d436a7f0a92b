"""mkdocs hooks (mkdocs.yml): the site pages that are repository files.

The README is the site's home page, ``benchmarks/README.md`` its benchmarks page and
``CHANGELOG.md`` its changelog, with no second copy to keep in step: each of those pages in
``docs/`` is a stub whose text this hook replaces by the file's, its relative links pointed at
the site's pages (``docs/x.md`` becomes ``x.md``). A link to anything the site does not hold
stops the build, so that a README link cannot rot on the site alone.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

# site page (in docs/) -> the repository file it shows
MIRRORS = {"index.md": "README.md", "benchmarks.md": "benchmarks/README.md", "changelog.md": "CHANGELOG.md"}
PAGE_OF = {source: page for page, source in MIRRORS.items()}
LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def site_target(target: str, source: str) -> str:
    """The link ``target``, written in the repository file ``source``, as the site's link."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return target  # a URL, or an anchor in the same page
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    if resolved.startswith("docs/"):
        page = resolved.removeprefix("docs/")
    elif resolved in PAGE_OF:
        page = PAGE_OF[resolved]
    else:
        raise PluginError(f"{source} links to {target}, which the documentation site does not hold")
    return page + (f"#{anchor}" if anchor else "")


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = MIRRORS.get(page.file.src_uri)
    if source is None:
        return markdown
    text = (Path(config.config_file_path).parent / source).read_text(encoding="utf-8")
    return LINK.sub(lambda m: m[1] + site_target(m[2], source) + m[3], text)
