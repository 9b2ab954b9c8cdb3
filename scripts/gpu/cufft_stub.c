/* Stand-in for libcufft.so.11 so that ASTRA's CUDA library loads next to a CUDA 13 runtime.
   Only ASTRA's FBP/FDK filters call cuFFT; the benchmark uses forward and back projection. */
typedef int cufftResult;
cufftResult cufftPlan1d(void *plan, int nx, int type, int batch) { return 5; }
cufftResult cufftExecR2C(int plan, void *a, void *b) { return 5; }
cufftResult cufftExecC2R(int plan, void *a, void *b) { return 5; }
cufftResult cufftDestroy(int plan) { return 5; }
cufftResult cufftSetStream(int plan, void *s) { return 5; }
