/*
 * A fake libnvidia-ml.so.1 for tests: the real nvml-wrapper code path, simulated GPUs.
 *
 * The GPUs come from the file named by FAKE_NVML_CONFIG, re-read whenever it changes, so a
 * test can make a GPU fall off the bus or raise an XID while the daemon runs. One directive a
 * line, '#' starts a comment:
 *
 *   driver <driver version>            e.g. driver 550.54.15
 *   cuda <int>                         CUDA driver version as NVML encodes it, e.g. 12040
 *   nvml <nvml version>                e.g. nvml 12.550.54.15
 *   gpu <total_mb> <used_mb> <util%> <temp_c> <power_mw> <mig 0|1> <ecc_corrected> \
 *       <ecc_uncorrected> <state> <uuid> <name ...>
 *                                      state: ok | lost (NVML_ERROR_GPU_IS_LOST on every
 *                                      query) | noecc (ECC queries: NOT_SUPPORTED)
 *   xid <gpu index> <code>             an XID event, delivered once, in file order
 *   process <gpu index> <pid> <used_mb>
 *                                      a compute process on that GPU (host PID, as NVML gives)
 *   fail_init <nvml return code>       nvmlInit fails with this code
 *
 * With FAKE_NVML_COUNT_FILE set, every nvmlDeviceGetCount_v2 call (one per GPU reading of the
 * daemon) writes how many there were so far into that file, so a test can count readings.
 *
 * Only what nvml-wrapper needs for the daemon's probe is implemented; any other symbol is
 * missing, which nvml-wrapper reports as a function-not-found error, as with an old driver.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <pthread.h>

#define MAX_GPUS 64
#define MAX_XIDS 1024
#define MAX_PROCESSES 256

enum {
    OK = 0, ERR_UNINITIALIZED = 1, ERR_INVALID_ARGUMENT = 2, ERR_NOT_SUPPORTED = 3,
    ERR_INSUFFICIENT_SIZE = 7, ERR_DRIVER_NOT_LOADED = 9, ERR_TIMEOUT = 10, ERR_GPU_IS_LOST = 15,
    ERR_UNKNOWN = 999
};

typedef struct {
    int index;
    unsigned long long total_mb, used_mb;
    unsigned int util, temp, power_mw, mig;
    unsigned long long ecc_corrected, ecc_uncorrected;
    char state[16];
    char uuid[96];
    char name[96];
} gpu_t;

typedef struct { int gpu; unsigned long long code; } xid_t;

typedef struct { int gpu; unsigned int pid; unsigned long long used_mb; } process_t;

/* nvmlProcessInfo_t (v2 layout, as the _v3 entry points fill it). */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} process_info_t;

typedef struct {
    void *device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} event_data_t;

typedef struct { unsigned int gpu; unsigned int memory; } utilization_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} memory_v2_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static gpu_t gpus[MAX_GPUS];
static int gpu_count;
static xid_t xids[MAX_XIDS];
static int xid_count;
static process_t processes[MAX_PROCESSES];
static int process_count;
static int xids_delivered;
static char driver[80] = "550.54.15", nvml_version[80] = "12.550.54.15";
static int cuda = 12040;
static int fail_init;
static int initialized;
static time_t loaded_mtime;
static long loaded_mtime_ns;
static off_t loaded_size = -1;
static int event_set_token;

static void reload_locked(void) {
    const char *path = getenv("FAKE_NVML_CONFIG");
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        gpu_count = 0;
        xid_count = 0;
        process_count = 0;
        return;
    }
    if (st.st_mtim.tv_sec == loaded_mtime && st.st_mtim.tv_nsec == loaded_mtime_ns && st.st_size == loaded_size) {
        return;
    }
    FILE *f = fopen(path, "r");
    if (!f) return;
    loaded_mtime = st.st_mtim.tv_sec;
    loaded_mtime_ns = st.st_mtim.tv_nsec;
    loaded_size = st.st_size;
    gpu_count = 0;
    xid_count = 0;
    process_count = 0;
    fail_init = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (line[0] == '#' || line[0] == 0) continue;
        if (strncmp(line, "driver ", 7) == 0) {
            snprintf(driver, sizeof driver, "%.79s", line + 7);
        } else if (strncmp(line, "nvml ", 5) == 0) {
            snprintf(nvml_version, sizeof nvml_version, "%.79s", line + 5);
        } else if (strncmp(line, "cuda ", 5) == 0) {
            cuda = atoi(line + 5);
        } else if (strncmp(line, "fail_init ", 10) == 0) {
            fail_init = atoi(line + 10);
        } else if (strncmp(line, "xid ", 4) == 0 && xid_count < MAX_XIDS) {
            xid_t *x = &xids[xid_count];
            if (sscanf(line + 4, "%d %llu", &x->gpu, &x->code) == 2) xid_count++;
        } else if (strncmp(line, "process ", 8) == 0 && process_count < MAX_PROCESSES) {
            process_t *p = &processes[process_count];
            if (sscanf(line + 8, "%d %u %llu", &p->gpu, &p->pid, &p->used_mb) == 3) process_count++;
        } else if (strncmp(line, "gpu ", 4) == 0 && gpu_count < MAX_GPUS) {
            gpu_t *g = &gpus[gpu_count];
            int n = 0;
            if (sscanf(line + 4, "%llu %llu %u %u %u %u %llu %llu %15s %95s %n", &g->total_mb, &g->used_mb,
                       &g->util, &g->temp, &g->power_mw, &g->mig, &g->ecc_corrected, &g->ecc_uncorrected,
                       g->state, g->uuid, &n) >= 10 && n > 0) {
                snprintf(g->name, sizeof g->name, "%.95s", line + 4 + n);
                g->index = gpu_count;
                gpu_count++;
            }
        }
    }
    fclose(f);
    /* A rewritten file may hold fewer events than were delivered. */
    if (xids_delivered > xid_count) xids_delivered = xid_count;
}

/* Every entry point takes the lock and sees the current file. */
#define ENTER() pthread_mutex_lock(&lock); reload_locked()
#define LEAVE(rc) do { int _rc = (rc); pthread_mutex_unlock(&lock); return _rc; } while (0)

static gpu_t *device(void *handle) {
    long i = (long)handle - 1;
    if (i < 0 || i >= gpu_count) return NULL;
    return &gpus[i];
}

/* The checks every device query starts with. */
#define DEVICE(handle, g)                                   \
    ENTER();                                                \
    if (!initialized) LEAVE(ERR_UNINITIALIZED);             \
    gpu_t *g = device(handle);                              \
    if (!g) LEAVE(ERR_INVALID_ARGUMENT);                    \
    if (strcmp(g->state, "lost") == 0) LEAVE(ERR_GPU_IS_LOST)

static int copy_string(char *out, unsigned int length, const char *value) {
    if (!out) return ERR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return ERR_INSUFFICIENT_SIZE;
    strcpy(out, value);
    return OK;
}

int nvmlInit_v2(void) {
    ENTER();
    if (fail_init) LEAVE(fail_init);
    initialized++;
    LEAVE(OK);
}

int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

int nvmlShutdown(void) {
    ENTER();
    if (!initialized) LEAVE(ERR_UNINITIALIZED);
    initialized--;
    LEAVE(OK);
}

const char *nvmlErrorString(int result) {
    switch (result) {
    case OK: return "Success";
    case ERR_UNINITIALIZED: return "Uninitialized";
    case ERR_INVALID_ARGUMENT: return "Invalid Argument";
    case ERR_NOT_SUPPORTED: return "Not Supported";
    case ERR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case ERR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case ERR_TIMEOUT: return "Timeout";
    case ERR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER();
    if (!initialized) LEAVE(ERR_UNINITIALIZED);
    LEAVE(copy_string(version, length, driver));
}

int nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    ENTER();
    LEAVE(copy_string(version, length, nvml_version));
}

int nvmlSystemGetCudaDriverVersion(int *version) {
    ENTER();
    if (!version) LEAVE(ERR_INVALID_ARGUMENT);
    *version = cuda;
    LEAVE(OK);
}

int nvmlSystemGetCudaDriverVersion_v2(int *version) {
    return nvmlSystemGetCudaDriverVersion(version);
}

static long count_calls;

int nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER();
    const char *count_file = getenv("FAKE_NVML_COUNT_FILE");
    if (count_file) {
        count_calls++;
        FILE *f = fopen(count_file, "w");
        if (f) {
            fprintf(f, "%ld\n", count_calls);
            fclose(f);
        }
    }
    if (!initialized) LEAVE(ERR_UNINITIALIZED);
    if (!count) LEAVE(ERR_INVALID_ARGUMENT);
    *count = (unsigned int)gpu_count;
    LEAVE(OK);
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    ENTER();
    if (!initialized) LEAVE(ERR_UNINITIALIZED);
    if (!handle || index >= (unsigned int)gpu_count) LEAVE(ERR_INVALID_ARGUMENT);
    *handle = (void *)(long)(index + 1);
    LEAVE(OK);
}

int nvmlDeviceGetIndex(void *handle, unsigned int *index) {
    DEVICE(handle, g);
    *index = (unsigned int)g->index;
    LEAVE(OK);
}

int nvmlDeviceGetName(void *handle, char *name, unsigned int length) {
    DEVICE(handle, g);
    LEAVE(copy_string(name, length, g->name));
}

int nvmlDeviceGetUUID(void *handle, char *uuid, unsigned int length) {
    DEVICE(handle, g);
    LEAVE(copy_string(uuid, length, g->uuid));
}

int nvmlDeviceGetMemoryInfo_v2(void *handle, memory_v2_t *memory) {
    DEVICE(handle, g);
    if (!memory) LEAVE(ERR_INVALID_ARGUMENT);
    const unsigned long long mib = 1024ULL * 1024ULL;
    memory->total = g->total_mb * mib;
    memory->used = g->used_mb * mib;
    memory->reserved = 0;
    memory->free = memory->total - memory->used;
    LEAVE(OK);
}

int nvmlDeviceGetUtilizationRates(void *handle, utilization_t *utilization) {
    DEVICE(handle, g);
    if (!utilization) LEAVE(ERR_INVALID_ARGUMENT);
    utilization->gpu = g->util;
    utilization->memory = g->util / 2;
    LEAVE(OK);
}

int nvmlDeviceGetTemperature(void *handle, int sensor, unsigned int *temp) {
    DEVICE(handle, g);
    if (sensor != 0 || !temp) LEAVE(ERR_INVALID_ARGUMENT);
    *temp = g->temp;
    LEAVE(OK);
}

int nvmlDeviceGetPowerUsage(void *handle, unsigned int *power) {
    DEVICE(handle, g);
    if (!power) LEAVE(ERR_INVALID_ARGUMENT);
    *power = g->power_mw;
    LEAVE(OK);
}

int nvmlDeviceGetMigMode(void *handle, unsigned int *current, unsigned int *pending) {
    DEVICE(handle, g);
    if (!current || !pending) LEAVE(ERR_INVALID_ARGUMENT);
    *current = g->mig;
    *pending = g->mig;
    LEAVE(OK);
}

/* errorType 0 = corrected, 1 = uncorrected; counterType 0 = volatile, 1 = aggregate. */
int nvmlDeviceGetTotalEccErrors(void *handle, int error_type, int counter_type, unsigned long long *count) {
    DEVICE(handle, g);
    (void)counter_type;
    if (!count) LEAVE(ERR_INVALID_ARGUMENT);
    if (strcmp(g->state, "noecc") == 0) LEAVE(ERR_NOT_SUPPORTED);
    *count = error_type == 0 ? g->ecc_corrected : g->ecc_uncorrected;
    LEAVE(OK);
}

int nvmlEventSetCreate(void **set) {
    ENTER();
    if (!initialized) LEAVE(ERR_UNINITIALIZED);
    if (!set) LEAVE(ERR_INVALID_ARGUMENT);
    *set = &event_set_token;
    LEAVE(OK);
}

int nvmlDeviceRegisterEvents(void *handle, unsigned long long types, void *set) {
    DEVICE(handle, g);
    (void)types;
    if (set != &event_set_token) LEAVE(ERR_INVALID_ARGUMENT);
    LEAVE(OK);
}

int nvmlDeviceGetSupportedEventTypes(void *handle, unsigned long long *types) {
    DEVICE(handle, g);
    if (!types) LEAVE(ERR_INVALID_ARGUMENT);
    *types = 0x8 | 0x2 | 0x4; /* XID critical, single- and double-bit ECC */
    LEAVE(OK);
}

/* Delivers the next undelivered `xid` line, or times out. */
int nvmlEventSetWait_v2(void *set, event_data_t *data, unsigned int timeout_ms) {
    for (unsigned int waited = 0;; waited += 10) {
        ENTER();
        if (set != &event_set_token || !data) LEAVE(ERR_INVALID_ARGUMENT);
        if (xids_delivered < xid_count) {
            xid_t *x = &xids[xids_delivered++];
            memset(data, 0, sizeof *data);
            data->device = (void *)(long)(x->gpu + 1);
            data->eventType = 0x8;
            data->eventData = x->code;
            data->gpuInstanceId = 0xFFFFFFFF;
            data->computeInstanceId = 0xFFFFFFFF;
            LEAVE(OK);
        }
        pthread_mutex_unlock(&lock);
        if (waited >= timeout_ms) return ERR_TIMEOUT;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

int nvmlEventSetFree(void *set) {
    (void)set;
    return OK;
}

/* As the driver: with too small a buffer (or none) the count is set and INSUFFICIENT_SIZE
 * returned, unless there are no processes. */
int nvmlDeviceGetComputeRunningProcesses_v3(void *handle, unsigned int *count, process_info_t *infos) {
    DEVICE(handle, g);
    if (!count) LEAVE(ERR_INVALID_ARGUMENT);
    unsigned int n = 0;
    for (int i = 0; i < process_count; i++) {
        if (processes[i].gpu == g->index) n++;
    }
    if (n == 0) {
        *count = 0;
        LEAVE(OK);
    }
    if (!infos || *count < n) {
        *count = n;
        LEAVE(ERR_INSUFFICIENT_SIZE);
    }
    unsigned int k = 0;
    for (int i = 0; i < process_count; i++) {
        if (processes[i].gpu != g->index) continue;
        infos[k].pid = processes[i].pid;
        infos[k].usedGpuMemory = processes[i].used_mb * 1024ULL * 1024ULL;
        infos[k].gpuInstanceId = 0xFFFFFFFFu;
        infos[k].computeInstanceId = 0xFFFFFFFFu;
        k++;
    }
    *count = k;
    LEAVE(OK);
}
