/* Scaffolding of spikemar's CPU kernels that knows nothing of any neuron: running jobs in
 * parallel on torch's own thread team, and splitting work into per-thread ranges. Included once,
 * first, by a kernel file (atmn.c) before its per-type bodies (simd.h, multistep.h and the
 * neuron's _impl.h per element type); it brings the C headers and the CAT / HOT macros they all
 * use. plan_ranges cuts [0, total) into ranges, run_parallel runs a worker per range. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
/* the bodies that must inline into their callers, whose constant flags then fold away */
#define HOT static inline __attribute__((always_inline))

/* Parallel runs. After each of its parallel regions, torch's OpenMP threads spin for a while
 * before they sleep (libgomp's default wait policy), so threads of our own would contend with
 * them for the cores: on 2 cores, ATMN's backward right after a torch op took 2.9 ms on its own
 * pthreads against 1.7 ms with the spinning turned off. When the process has GNU libgomp loaded
 * (torch's Linux wheels bundle it under the SONAME libgomp.so.1), the work therefore runs on
 * that runtime's thread team, the threads torch itself uses, found with dlopen(RTLD_NOLOAD) and
 * called through its stable entry point GOMP_parallel; nothing links against a second OpenMP
 * runtime. Without it (another runtime, another OS) the work runs on pthreads. */
enum { MAX_THREADS = 64 }; /* the most threads (and jobs) of one parallel run */

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel;
static omp_int_fn omp_thread_num, omp_num_threads;
static pthread_once_t gomp_once = PTHREAD_ONCE_INIT;
static int threading_mode = 1; /* 1: libgomp's team when loaded, 0: pthreads (for tests) */

static void find_gomp(void) {
  void *lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) return;
  void *p = dlsym(lib, "GOMP_parallel"), *n = dlsym(lib, "omp_get_thread_num");
  void *m = dlsym(lib, "omp_get_num_threads");
  if (!p || !n || !m) return;
  memcpy(&gomp_parallel, &p, sizeof p);
  memcpy(&omp_thread_num, &n, sizeof n);
  memcpy(&omp_num_threads, &m, sizeof m);
}

/* Selects the threading (1: torch's libgomp team when loaded, 0: pthreads; -1 leaves it) and
 * returns the one in effect: 1 libgomp, 0 pthreads. */
int atmn_threading(int mode) {
  pthread_once(&gomp_once, find_gomp);
  if (mode >= 0) threading_mode = mode;
  return threading_mode && gomp_parallel != NULL;
}

typedef struct {
  void *(*worker)(void *);
  char *jobs;
  size_t job_size;
  int njobs;
} team_t;

/* every job runs once whatever the team's size (a nested call gets a team of one) */
static void team_body(void *arg) {
  const team_t *team = arg;
  for (int k = omp_thread_num(); k < team->njobs; k += omp_num_threads())
    team->worker(team->jobs + (size_t)k * team->job_size);
}

/* worker(&jobs[k]) for every k < njobs, in parallel; jobs is an array of job_size-byte items */
static void run_parallel(void *(*worker)(void *), void *jobs, size_t job_size, int njobs) {
  char *items = jobs;
  if (njobs > 1 && atmn_threading(-1)) {
    team_t team = {worker, items, job_size, njobs};
    gomp_parallel(team_body, &team, (unsigned)njobs, 0);
    return;
  }
  pthread_t threads[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int k = 1; k < njobs && k < MAX_THREADS; ++k)
    started[k] = pthread_create(&threads[k], NULL, worker, items + (size_t)k * job_size) == 0;
  worker(items);
  for (int k = 1; k < njobs && k < MAX_THREADS; ++k) {
    if (started[k]) pthread_join(threads[k], NULL);
    else worker(items + (size_t)k * job_size); /* no thread could be made: its job runs here */
  }
}

/* Cuts [0, units·unit) (clipped to total) into at most nthreads contiguous ranges of whole
 * units, as even as whole units allow; returns the number of ranges (at least 1). Thread k gets
 * [begin[k], end[k]). */
static int plan_ranges(int64_t units, int64_t unit, int64_t total, int nthreads, int64_t *begin,
                       int64_t *end) {
  if (nthreads > units) nthreads = (int)(units > 0 ? units : 1);
  if (nthreads < 1) nthreads = 1;
  if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
  for (int k = 0; k < nthreads; ++k) {
    begin[k] = units * k / nthreads * unit;
    end[k] = units * (k + 1) / nthreads * unit;
    if (begin[k] > total) begin[k] = total;
    if (end[k] > total) end[k] = total;
  }
  return nthreads;
}
