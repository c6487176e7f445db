package ai.onnxruntime;

import java.util.Map;
import java.util.Set;

public class OrtSession implements AutoCloseable {
    public Set<String> getInputNames() { throw new RuntimeException("stub"); }
    public Set<String> getOutputNames() { throw new RuntimeException("stub"); }
    public Result run(Map<String, ? extends OnnxTensorLike> inputs) throws OrtException { throw new RuntimeException("stub"); }
    @Override public void close() throws OrtException { throw new RuntimeException("stub"); }

    public static class Result implements AutoCloseable, Iterable<Map.Entry<String, OnnxValue>> {
        @Override public java.util.Iterator<Map.Entry<String, OnnxValue>> iterator() { throw new RuntimeException("stub"); }
        @Override public void close() { throw new RuntimeException("stub"); }
    }

    public static class SessionOptions implements AutoCloseable {
        public enum OptLevel { NO_OPT, BASIC_OPT, EXTENDED_OPT, ALL_OPT }
        public void setOptimizationLevel(OptLevel level) throws OrtException { throw new RuntimeException("stub"); }
        public void setIntraOpNumThreads(int numThreads) throws OrtException { throw new RuntimeException("stub"); }
        public void setInterOpNumThreads(int numThreads) throws OrtException { throw new RuntimeException("stub"); }
        public void addNnapi() throws OrtException { throw new RuntimeException("stub"); }
        @Override public void close() { throw new RuntimeException("stub"); }
    }
}
