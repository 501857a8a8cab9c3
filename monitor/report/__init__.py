"""The regulator's report: build (figures) separate from render (formats).

- :mod:`~monitor.report.read`: every query the report makes, inside one read
  snapshot of the store;
- :mod:`~monitor.report.build`: the report document, a JSON-ready dict of all
  the figures (periods from :mod:`monitor.core.periods`, times from
  :mod:`monitor.core.timefmt`);
- :mod:`~monitor.report.render` and :mod:`~monitor.report.chart`: that one
  document as JSON, CSV and HTML (Jinja2 templates in ``templates/``, with
  autoescaping; English and Russian; inline SVG charts);
- :mod:`~monitor.report.write`: the ``report`` command: build once, write one
  format or all of them under one digest with a manifest.

May import the core, the configuration, the store and the rules' site filters;
never the intake, MQTT or the network.
"""

from monitor.report.build import PeriodNotStartedError, build_report, content_sha256
from monitor.report.render import LANGS, csv_sections, parse_csv, to_csv, to_html, to_json
from monitor.report.write import run, write_all

__all__ = ["LANGS", "PeriodNotStartedError", "build_report", "content_sha256",
           "csv_sections", "parse_csv", "run", "to_csv", "to_html", "to_json", "write_all"]
