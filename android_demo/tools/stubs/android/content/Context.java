package android.content;

public abstract class Context {
    public final String getString(int resId) { throw new RuntimeException("stub"); }
    public final String getString(int resId, Object... formatArgs) { throw new RuntimeException("stub"); }
    public abstract java.io.File getExternalFilesDir(String type);
}
