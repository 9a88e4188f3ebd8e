"""The two engines that run the mining rule: DuckDB, embedded and out of core, and Spark (local or a cluster), the
rule transpiled from DuckDB's SQL to Spark SQL by sqlglot.

    engine = DuckDBEngine(memory_limit="2GB", threads=2)      # or SparkEngine()
    engine.load("raw_posts", "posts.parquet"); engine.load("raw_events", "events.parquet")
    engine.rows("SELECT count(*) FROM pairs")
"""
import glob
import os
import shutil
import tempfile

from social_reward.errors import InputError
from social_reward.mining.machine import machine_memory_limit, machine_threads
from social_reward.mining.rule import VIEW, sql_text


def _read(path):
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    kind = "csv" if files and files[0].endswith(".csv") else "parquet"
    return files, kind


class DuckDBEngine:
    """DuckDB, embedded: reads parquet/csv in place, spills to disk past its memory limit (--memory_limit, else
    machine_memory_limit), on --threads threads (else the cores this process may use)."""

    def __init__(self, memory_limit=None, threads=None, temp_directory=None):
        import duckdb
        self.db = duckdb.connect()
        self.db.execute("SET TimeZone = 'UTC'")
        self.db.execute("SET preserve_insertion_order = false")
        threads = threads or machine_threads()
        self.db.execute(f"SET threads = {int(threads)}")
        self.db.execute(f"SET memory_limit = {sql_text(memory_limit or machine_memory_limit(threads))}")
        if temp_directory:
            self.db.execute(f"SET temp_directory = {sql_text(temp_directory)}")

    def load(self, name, source):
        if not isinstance(source, str):  # a DataFrame in a notebook
            self.db.register(f"{name}_frame", source)
            self.db.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {name}_frame")
            return
        files, kind = _read(source)
        reader = "read_csv" if kind == "csv" else "read_parquet"
        self.db.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {reader}([{', '.join(map(sql_text, files))}])")

    def columns(self, name):
        """{column: type} of a table or view."""
        return {row[0]: row[1] for row in self.db.execute(f"DESCRIBE {name}").fetchall()}

    def create(self, name, query):
        kind = "VIEW" if query.startswith(VIEW) else "TABLE"
        self.db.execute(f"CREATE OR REPLACE TEMP {kind} {name} AS {query}")

    def rows(self, query):
        return self.db.execute(query).fetchall()

    def write_parquet(self, query, path):
        self.db.execute(f"COPY ({query}) TO {sql_text(path)} (FORMAT parquet)")

    def close(self):
        self.db.close()


def check_java():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise InputError("--engine spark: no Java runtime found (java is not on PATH, JAVA_HOME unset); "
                         "install one, e.g. apt-get install openjdk-17-jre-headless")


class SparkEngine:
    """Apache Spark through PySpark: local mode on one machine (local[threads]), or the session spark-submit made.
    Data comes in and goes out as parquet, never through pandas."""

    def __init__(self, memory_limit=None, threads=None, temp_directory=None):
        check_java()
        from pyspark.sql import SparkSession
        builder = SparkSession.builder.appName("social_pairs").config("spark.sql.session.timeZone", "UTC")
        builder = builder.config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "8")
        if not os.environ.get("SPARK_MASTER") and "spark.master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
            builder = builder.master(f"local[{threads or '*'}]")
        if memory_limit:
            builder = builder.config("spark.driver.memory", memory_limit)
        self.spark = builder.getOrCreate()
        self.temp = tempfile.mkdtemp(prefix="social_pairs_spark_", dir=temp_directory)

    def load(self, name, source):
        if not isinstance(source, str):  # a DataFrame: through a parquet file (PySpark 4 warns about pandas 3)
            path = os.path.join(self.temp, f"{name}.parquet")
            source.to_parquet(path, coerce_timestamps="us", allow_truncated_timestamps=True)
            source = path
        files, kind = _read(source)
        reader = self.spark.read.option("header", True).option("inferSchema", True) if kind == "csv" else self.spark.read
        frame = reader.csv(files) if kind == "csv" else reader.parquet(*files)
        frame.createOrReplaceTempView(name)

    def columns(self, name):
        """{column: type} of a table or view."""
        return dict(self.spark.table(name).dtypes)

    def create(self, name, query):
        frame = self.spark.sql(spark_sql(query))
        if not query.startswith(VIEW):
            frame = frame.localCheckpoint()  # computed once, as DuckDB's temp tables
        frame.createOrReplaceTempView(name)

    def rows(self, query):
        return [tuple(row) for row in self.spark.sql(spark_sql(query)).collect()]

    def write_parquet(self, query, path):
        folder = path + ".parts"
        self.spark.sql(spark_sql(query)).coalesce(1).write.mode("overwrite").parquet(folder)
        part, = glob.glob(os.path.join(folder, "part-*.parquet"))  # coalesce(1) keeps the order of ORDER BY
        os.replace(part, path)
        shutil.rmtree(folder)

    def close(self):
        shutil.rmtree(self.temp, ignore_errors=True)


def spark_sql(query):
    import sqlglot  # Spark's alone
    return sqlglot.transpile(query, read="duckdb", write="spark")[0]


ENGINES = {"duckdb": DuckDBEngine, "spark": SparkEngine}
