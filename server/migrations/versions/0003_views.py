"""SQL views for operators (Grafana, psql): ``latency_buckets``, ``device_availability``,
``device_hourly``, ``model_latency``. Documented in the README (section "The SQL store").

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

N_BUCKETS = 72
BOUNDS_MS = [0.01 * 10 ** (i / 10) for i in range(N_BUCKETS - 1)]  # sdk.protocol.histogram
VIEWS = ("model_latency", "device_hourly", "device_availability", "latency_buckets")


def _sql(dialect: str) -> list[str]:
    pg = dialect == "postgresql"
    secs = (lambda a, b: f"EXTRACT(EPOCH FROM ({b} - {a}))") if pg else \
        (lambda a, b: f"((julianday({b}) - julianday({a})) * 86400.0)")
    now = "(now() AT TIME ZONE 'utc')" if pg else "datetime('now')"
    group = "(d.labels::json ->> 'group')" if pg else "json_extract(d.labels, '$.group')"
    buckets = ", ".join(f"SUM(h.b{i:02d}) AS b{i:02d}" for i in range(N_BUCKETS))
    rows = " UNION ALL ".join(
        f"SELECT {i} AS bucket, {'CAST(NULL AS DOUBLE PRECISION)' if pg else 'NULL'} AS upper_ms"
        if i == N_BUCKETS - 1 else f"SELECT {i} AS bucket, {BOUNDS_MS[i]!r} AS upper_ms"
        for i in range(N_BUCKETS))
    return [
        # bucket i of every latency histogram counts latencies in (upper_ms[i-1], upper_ms[i]] ms
        f"CREATE VIEW latency_buckets AS {rows}",
        f"""CREATE VIEW device_availability AS
SELECT d.id AS device_id, {group} AS device_group,
       EXISTS (SELECT 1 FROM connection_sessions o WHERE o.device_id = d.id AND o.ended_at IS NULL) AS online,
       d.first_seen, d.last_seen,
       (SELECT COUNT(*) FROM connection_sessions s WHERE s.device_id = d.id AND s.ended_at IS NOT NULL) AS outages,
       COALESCE((SELECT SUM({secs('s.started_at', f'COALESCE(s.ended_at, {now})')})
                 FROM connection_sessions s WHERE s.device_id = d.id), 0) AS online_s,
       {secs('d.first_seen', now)} AS known_s
FROM devices d""",
        """CREATE VIEW device_hourly AS
SELECT h.hour, h.device_id, h.artifact, h.model_version, SUM(h.intervals) AS intervals,
       SUM(h.count) AS inferences, SUM(h.errors) AS errors,
       CASE WHEN SUM(h.count) > 0 THEN 1.0 * SUM(h.errors) / SUM(h.count) END AS error_rate,
       CASE WHEN SUM(h.count) > SUM(h.errors) THEN SUM(h.latency_sum_ms) / (SUM(h.count) - SUM(h.errors)) END
         AS mean_latency_ms
FROM telemetry_hourly h GROUP BY h.hour, h.device_id, h.artifact, h.model_version""",
        f"""CREATE VIEW model_latency AS
SELECT h.hour, h.artifact, a.name AS model_name, h.model_version, COUNT(DISTINCT h.device_id) AS devices,
       SUM(h.count) AS inferences, SUM(h.errors) AS errors,
       CASE WHEN SUM(h.count) > 0 THEN 1.0 * SUM(h.errors) / SUM(h.count) END AS error_rate,
       CASE WHEN SUM(h.count) > SUM(h.errors) THEN SUM(h.latency_sum_ms) / (SUM(h.count) - SUM(h.errors)) END
         AS mean_latency_ms,
       {buckets}
FROM telemetry_hourly h LEFT JOIN artifacts a ON a.sha256 = h.artifact
GROUP BY h.hour, h.artifact, a.name, h.model_version""",
    ]


def upgrade() -> None:
    for stmt in _sql(op.get_bind().dialect.name):
        op.execute(sa.text(stmt))


def downgrade() -> None:
    for view in VIEWS:
        op.execute(sa.text(f"DROP VIEW IF EXISTS {view}"))
