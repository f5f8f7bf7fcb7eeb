# Sourced by the scripts: which PostgreSQL installation to build against,
# install into and test with.
#
#   PG_CONFIG=/path/to/pg_config   that installation (make's own variable)
#   PG_MAJOR=NN                    Debian's postgresql-NN (installed when missing)
#
# Neither: the newest server installed under /usr/lib/postgresql, or, when
# there is none, the version Debian's postgresql package would install.
# Sets and exports PG_MAJOR, PG_CONFIG and PG_BINDIR.
pg_select() {
	if [ -n "${PG_CONFIG:-}" ]; then
		[ -x "$PG_CONFIG" ] || { echo "PG_CONFIG=$PG_CONFIG is not an executable pg_config" >&2; return 1; }
		PG_MAJOR="$("$PG_CONFIG" --version | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')"
		PG_BINDIR="$("$PG_CONFIG" --bindir)"
	else
		if [ -z "${PG_MAJOR:-}" ]; then
			PG_MAJOR="$(ls -1 /usr/lib/postgresql/*/bin/postgres 2>/dev/null |
				sed -n 's|^/usr/lib/postgresql/\([0-9][0-9]*\)/bin/postgres$|\1|p' | sort -n | tail -n 1)"
		fi
		if [ -z "${PG_MAJOR:-}" ]; then
			PG_MAJOR="$(apt-cache show postgresql 2>/dev/null |
				sed -n 's/^Depends:.*postgresql-\([0-9][0-9]*\).*/\1/p' | sort -n | tail -n 1)"
		fi
		[ -n "${PG_MAJOR:-}" ] || { echo "cannot tell which PostgreSQL to use: set PG_MAJOR or PG_CONFIG" >&2; return 1; }
		PG_BINDIR="/usr/lib/postgresql/$PG_MAJOR/bin"
		PG_CONFIG="$PG_BINDIR/pg_config"
	fi
	export PG_MAJOR PG_CONFIG PG_BINDIR
}
