/* gcc -shared -fPIC -O2 -o /tmp/slowgil.so scripts/slowgil.c -ldl
 *   then: LD_PRELOAD=/tmp/slowgil.so [SLOWGIL_MS=300] accelerate launch ... (or torchrun ...)
 *
 * Amplifier for the exit crash that close_process_group prevents (a rank SIGABRTs at exit with "terminate called
 * without an active exception"): a gloo worker thread (pt_gloo_runloop) that asks for the GIL is held back
 * SLOWGIL_MS ms (default 300) first, as a worker starved on a busy machine would be, so it reaches take_gil after
 * the main thread has begun the interpreter's finalization. See close_process_group in trainers/runtime.py for the
 * chain. Interposes the two CPython entry points through which torch (pybind11::gil_scoped_acquire) and others
 * take the GIL.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

static void delay_if_gloo_worker(const char *what) {
    char name[32] = {0};
    prctl(PR_GET_NAME, name, 0, 0, 0);
    if (strcmp(name, "pt_gloo_runloop") == 0) {
        const char *ms = getenv("SLOWGIL_MS");
        fprintf(stderr, "[slowgil] %s from pt_gloo_runloop (tid %d): holding it %s ms\n", what, gettid(), ms ? ms : "300");
        usleep(1000 * (ms ? atoi(ms) : 300));
    }
}

void PyEval_AcquireThread(void *tstate) {
    static void (*real)(void *);
    if (!real) real = dlsym(RTLD_NEXT, "PyEval_AcquireThread");
    delay_if_gloo_worker("PyEval_AcquireThread");
    real(tstate);
}

int PyGILState_Ensure(void) {
    static int (*real)(void);
    if (!real) real = dlsym(RTLD_NEXT, "PyGILState_Ensure");
    delay_if_gloo_worker("PyGILState_Ensure");
    return real();
}
