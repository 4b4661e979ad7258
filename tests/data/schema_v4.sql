CREATE TABLE vms (
        id TEXT PRIMARY KEY, cloud TEXT NOT NULL, launch_id TEXT NOT NULL, state TEXT NOT NULL,
        launched_at REAL NOT NULL, state_since REAL NOT NULL, registered_at REAL,
        last_heartbeat REAL, idle_since REAL, job_id INTEGER, address TEXT,
        kill_requested INTEGER NOT NULL DEFAULT 0
    , token_hash TEXT, pilot_busy INTEGER NOT NULL DEFAULT 0);
CREATE INDEX vms_state ON vms(state);
CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, env TEXT NOT NULL,
        wall_time_s REAL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL, vm_id TEXT, submitted_at REAL NOT NULL,
        assigned_at REAL, started_at REAL, finished_at REAL, exit_code INTEGER,
        output_tail TEXT, reason TEXT
    , kind TEXT NOT NULL DEFAULT 'job', run_key TEXT, alien_job_id TEXT);
CREATE INDEX jobs_state ON jobs(state, id);
CREATE INDEX jobs_submitted ON jobs(submitted_at);
CREATE TABLE launches (
        id TEXT PRIMARY KEY, cloud TEXT NOT NULL, count INTEGER NOT NULL,
        client_token TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
        instance_ids TEXT NOT NULL DEFAULT '[]', error TEXT
    , settings_hash TEXT);
CREATE INDEX launches_state ON launches(state);
CREATE TABLE clouds (
        name TEXT PRIMARY KEY, backoff_until REAL NOT NULL, backoff_level INTEGER NOT NULL,
        boot_failures INTEGER NOT NULL, last_error TEXT
    );
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
        message TEXT NOT NULL, vm_id TEXT, job_id INTEGER, cloud TEXT
    , reason TEXT);
CREATE UNIQUE INDEX vms_token ON vms(token_hash);
CREATE TABLE assignments (
        job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, vm_id TEXT NOT NULL,
        assigned_at REAL NOT NULL, PRIMARY KEY (job_id, attempt)
    );
CREATE INDEX events_vm ON events(vm_id, seq);
CREATE INDEX events_ts ON events(ts);
CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX jobs_run_key ON jobs(run_key) WHERE run_key IS NOT NULL;
CREATE INDEX jobs_vm_state ON jobs(vm_id, state);
PRAGMA user_version = 4;
