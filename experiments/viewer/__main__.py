"""`python -m experiments.viewer serve RUN_DIR [--port N]` | `export RUN_DIR -o page.html`."""

from __future__ import annotations

import argparse

from experiments.viewer import page, server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.viewer", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve RUN_DIR on 127.0.0.1 (annotations saved beside each graph)")
    s.add_argument("run_dir")
    s.add_argument("--port", type=int, default=8046)
    e = sub.add_parser("export", help="write one self-contained HTML file")
    e.add_argument("run_dir")
    e.add_argument("-o", "--out", default="viewer.html")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        out = page.export(args.run_dir, args.out)
        print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
        return 0
    srv = server.make_server(args.run_dir, args.port)
    print(f"serving {args.run_dir} on http://{server.HOST}:{srv.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
